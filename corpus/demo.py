"""The built-in demo corpus: generated text in four clearly different domains, no download.

Every document is produced here from templates and word lists by a seeded random generator, so the corpus
is deterministic, free of third-party text, and small enough for a CPU demo. Domains (the `source` label):

- `cooking`  — recipe steps (ingredients, temperatures, utensils)
- `sports`   — match reports (teams, players, scores, minutes)
- `code`     — small Python functions with docstrings
- `medicine` — clinical case notes (symptoms, doses, tests)

`write_demo_corpus(out_dir)` writes `{train,valid,test}.jsonl.gz` with fields `id`, `text`, `source`.
The text is synthetic: it is grammatical but not meaningful, and its licence is the project's own.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Callable

from corpus.io import atomic_dir

DOMAINS = ("cooking", "sports", "code", "medicine")
SPLITS = {"train": 400, "valid": 40, "test": 40}  # documents per domain

def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---- cooking ---------------------------------------------------------------------------------------
_INGREDIENTS = ("flour", "butter", "sugar", "eggs", "milk", "garlic", "onions", "tomatoes", "basil", "olive oil",
                "salt", "pepper", "cinnamon", "yeast", "cream", "lemon zest", "rice", "chicken stock", "carrots",
                "parsley", "honey", "vanilla", "mushrooms", "thyme", "potatoes", "spinach", "ginger", "paprika")
_UTENSILS = ("saucepan", "skillet", "mixing bowl", "baking tray", "whisk", "wooden spoon", "oven dish", "colander",
             "food processor", "cast iron pan", "stockpot", "rolling pin")
_COOK_VERBS = ("whisk", "fold", "simmer", "saute", "knead", "roast", "stir", "chop", "blend", "season", "bake",
               "caramelize", "marinate", "drain", "grate", "braise")
_TEXTURES = ("smooth", "golden brown", "fluffy", "thick and glossy", "tender", "crisp", "fragrant", "bubbling",
             "soft peaks form", "reduced by half")
_DISHES = ("tomato soup", "lemon cake", "mushroom risotto", "roast chicken", "apple pie", "vegetable curry",
           "garlic bread", "pancakes", "potato gratin", "ginger stir fry", "banana bread", "onion tart")


def _cooking(r: random.Random) -> str:
    dish = r.choice(_DISHES)
    steps = [f"Recipe for {dish}, serves {r.randint(2, 8)}."]
    steps.append(f"Preheat the oven to {r.choice((160, 170, 180, 190, 200, 220))} degrees.")
    for _ in range(r.randint(5, 10)):
        a, b = r.sample(_INGREDIENTS, 2)
        t = r.choice((
            "{v} the {a} and the {b} in a {u} until {x}.",
            "Add {n} grams of {a} to the {u} and {v} gently.",
            "{v} the {a} for {m} minutes, then add the {b}.",
            "Season with {a} and {b}, then {v} until {x}.",
            "Transfer the {a} to a {u} and let it rest for {m} minutes.",
            "Slowly {v} in {n} ml of {b} while the {a} is still warm.",
        ))
        steps.append(_upper_first(t.format(v=r.choice(_COOK_VERBS), a=a, b=b, u=r.choice(_UTENSILS), x=r.choice(_TEXTURES),
                              n=r.randint(10, 500), m=r.randint(2, 45))))
    steps.append(f"Serve the {dish} {r.choice(('warm', 'chilled', 'at once', 'with fresh bread'))}.")
    return " ".join(steps)


# ---- sports ----------------------------------------------------------------------------------------
_TEAMS = ("Riverside Rovers", "Northfield United", "Harbor City", "Eastvale Athletic", "Kingsport Wanderers",
          "Millbrook Town", "Westgate Rangers", "Stonebridge FC", "Lakeside Albion", "Ashford Celtic")
_PLAYERS = ("Moreno", "Okafor", "Lindqvist", "Tanaka", "Brennan", "Duarte", "Kowalski", "Haddad", "Fischer",
            "Mbeki", "Rossi", "Novak", "Castillo", "Petrov")
_SPORT_EVENTS = (
    "{p} scored in the {m}th minute after a quick counter attack.",
    "The goalkeeper saved a penalty from {p} just before half time.",
    "{p} received a yellow card for a late tackle in midfield.",
    "A corner from {p} was headed over the bar in the {m}th minute.",
    "The coach replaced {p} with {q} on the hour mark.",
    "{p} hit the post from twenty yards as the home fans roared.",
    "{q} equalised with a volley in the {m}th minute.",
    "The referee awarded a free kick after {p} was fouled near the box.",
    "{p} was named player of the match after two assists.",
)


def _sports(r: random.Random) -> str:
    home, away = r.sample(_TEAMS, 2)
    hs, as_ = r.randint(0, 5), r.randint(0, 5)
    out = [f"{home} {'beat' if hs > as_ else 'drew with' if hs == as_ else 'lost to'} {away} {hs}-{as_} "
           f"in front of {r.randint(3, 60)},{r.randint(100, 999)} supporters on {r.choice(('Saturday', 'Sunday', 'Wednesday'))}."]
    for _ in range(r.randint(5, 10)):
        p, q = r.sample(_PLAYERS, 2)
        out.append(r.choice(_SPORT_EVENTS).format(p=p, q=q, m=r.randint(2, 90)))
    out.append(f"The result leaves {home} in {r.choice(('first', 'third', 'fifth', 'eighth', 'last'))} place "
               f"with {r.randint(10, 80)} points from {r.randint(10, 38)} games in the league table.")
    return " ".join(out)


# ---- code ------------------------------------------------------------------------------------------
_NOUNS = ("items", "records", "tokens", "matrix", "buffer", "config", "users", "events", "rows", "payload",
          "scores", "nodes", "edges", "cache", "queue", "path")
_VERBS = ("parse", "load", "merge", "filter", "count", "normalize", "flatten", "validate", "sort", "group",
          "encode", "split")
_EXPRS = ("len({a}) + {n}", "sorted({a}, key=len)", "[x for x in {a} if x]", "dict(zip({a}, {b}))",
          "{a}.get('{k}', {n})", "sum(x * {n} for x in {a})", "{a}[{n}:] + {b}[:{n}]", "max({a}, default={n})",
          "set({a}) | set({b})", "{a}.strip().split(',')", "isinstance({a}, dict)", "{a} is not None")


def _code(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(2, 4)):
        verb, noun = r.choice(_VERBS), r.choice(_NOUNS)
        args = r.sample(_NOUNS, r.randint(1, 3))
        lines.append(f"def {verb}_{noun}({', '.join(args)}):")
        lines.append(f'    """{verb.capitalize()} the {noun} and return the result."""')
        var = r.choice(("result", "out", "value", "acc", "total"))
        for _ in range(r.randint(2, 5)):
            a, b = r.choice(args), r.choice(_NOUNS)
            expr = r.choice(_EXPRS).format(a=a, b=b, n=r.randint(0, 64), k=r.choice(_NOUNS))
            kind = r.random()
            if kind < 0.2:
                lines.append(f"    if not {a}:")
                lines.append(f"        raise ValueError('empty {a}')")
            elif kind < 0.35:
                lines.append(f"    for x in {a}:")
                lines.append(f"        {var} = {expr}")
            else:
                lines.append(f"    {var} = {expr}")
        lines.append(f"    return {var}")
        lines.append("")
    return "\n".join(lines).strip()


# ---- medicine --------------------------------------------------------------------------------------
_SYMPTOMS = ("fever", "persistent cough", "chest pain", "shortness of breath", "headache", "nausea", "fatigue",
             "abdominal pain", "dizziness", "joint swelling", "rash", "palpitations", "night sweats", "back pain")
_TESTS = ("a full blood count", "an electrocardiogram", "a chest radiograph", "serum creatinine", "a CT scan",
          "liver function tests", "blood cultures", "a urine sample", "C-reactive protein", "an echocardiogram")
_DRUGS = ("amoxicillin", "paracetamol", "ibuprofen", "metformin", "atorvastatin", "omeprazole", "prednisolone",
          "furosemide", "salbutamol", "heparin")
_FINDINGS = ("elevated", "within normal limits", "mildly reduced", "markedly raised", "unremarkable",
             "consistent with infection", "suggestive of inflammation")


def _medicine(r: random.Random) -> str:
    s = r.sample(_SYMPTOMS, 3)
    out = [f"A {r.randint(18, 90)}-year-old {r.choice(('man', 'woman'))} presented to the clinic with "
           f"{s[0]} and {s[1]} for {r.randint(2, 21)} days."]
    out.append(f"There was a history of {r.choice(('hypertension', 'diabetes', 'asthma', 'smoking', 'kidney disease'))}.")
    for _ in range(r.randint(4, 8)):
        t = r.choice((
            "On examination the blood pressure was {a}/{b} mmHg and the heart rate {h} beats per minute.",
            "{T} was {f}.",
            "The patient was started on {d} {n} mg twice daily.",
            "Symptoms of {s} improved after {k} days of treatment with {d}.",
            "{T} was repeated and found to be {f}.",
            "The dose of {d} was reduced to {n} mg because of {s}.",
        ))
        out.append(_upper_first(t.format(
            a=r.randint(95, 180), b=r.randint(55, 110), h=r.randint(50, 130), T=r.choice(_TESTS),
            f=r.choice(_FINDINGS), d=r.choice(_DRUGS), n=r.choice((5, 10, 20, 40, 250, 500)), s=r.choice(s),
            k=r.randint(2, 14))))
    out.append(f"The patient was discharged with follow up in {r.randint(1, 8)} weeks.")
    return " ".join(out)


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "cooking": _cooking, "sports": _sports, "code": _code, "medicine": _medicine,
}


def generate_documents(split: str, n_per_domain: int, seed: int = 0) -> list[dict]:
    """Documents of one split, domains interleaved; deterministic for (split, n_per_domain, seed)."""
    docs = []
    for d_i, domain in enumerate(DOMAINS):
        r = random.Random(f"{seed}-{split}-{domain}")
        for i in range(n_per_domain):
            docs.append({"id": f"{split}-{domain}-{i:05d}", "text": GENERATORS[domain](r), "source": domain})
    order = random.Random(f"{seed}-{split}-order")
    order.shuffle(docs)
    return docs


def write_demo_corpus(out_dir: str | Path, seed: int = 0, scale: float = 1.0) -> Path:
    """Write the demo corpus to `out_dir/{train,valid,test}.jsonl.gz` (fields id, text, source).

    `scale` multiplies the number of documents per split (1.0: 400/40/40 per domain). Returns out_dir.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for split, n in SPLITS.items():
            docs = generate_documents(split, max(1, round(n * scale)), seed)
            with gzip.open(tmp / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps(doc) + "\n")
    return out_dir

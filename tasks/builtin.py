"""Prompt templates and verbalizers for the built-in few-shot tasks.

A prompt for k-shot in-context classification is

    instruction + demo_1 + sep + ... + demo_k + sep + query

with `demo_i = input_format.format(text=x_i) + " " + word(y_i)` and `query = input_format.format(text=x)`;
the model then scores `" " + word(y)` for every label y. `input_format` ends with the answer cue
(`"Topic:"`), which is also the domain premise for DC-PMI calibration (Holtzman et al. 2021).

Task names pick a template (ag_news, dbpedia → topic; sst2, cr → sentiment; trec → question type; subj →
subjectivity); unknown names get the generic template and the lower-cased label names as words.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Template:
    """How one example is written into a prompt."""

    input_format: str = "Input: {text}\nLabel:"  # must contain {text}; ends with the answer cue
    sep: str = "\n\n"  # between demonstrations and before the query
    instruction: str = ""  # written once before the first demonstration ("" for none)
    premise: str | None = None  # DC-PMI domain premise; None → the answer cue (text after the last {text})

    def __post_init__(self):
        if "{text}" not in self.input_format:
            raise ValueError(f"template input_format must contain '{{text}}': {self.input_format!r}")

    def format_input(self, text: str) -> str:
        return self.input_format.replace("{text}", text)

    def format_demo(self, text: str, word: str) -> str:
        return self.format_input(text) + " " + word

    def domain_premise(self) -> str:
        """Content-free context for DC-PMI: the template with no input, i.e. the answer cue ("Topic:")."""
        if self.premise is not None:
            return self.premise
        cue = self.input_format.rsplit("{text}", 1)[1].strip()
        return cue or "Answer:"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Template":
        return cls(**{k: d[k] for k in ("input_format", "sep", "instruction", "premise") if k in d})


TOPIC = Template("Article: {text}\nTopic:")
ENCYCLOPEDIA = Template("Text: {text}\nCategory:")
SENTIMENT = Template("Review: {text}\nSentiment:")
QUESTION = Template("Question: {text}\nAnswer type:")
SUBJECTIVITY = Template("Text: {text}\nType:")
DOMAIN = Template("Text: {text}\nDomain:")
GENERIC = Template("Input: {text}\nLabel:")

TEMPLATES_BY_KIND = {
    "topic": TOPIC,
    "encyclopedia": ENCYCLOPEDIA,
    "sentiment": SENTIMENT,
    "question": QUESTION,
    "subjectivity": SUBJECTIVITY,
    "domain": DOMAIN,
    "generic": GENERIC,
}


@dataclass(frozen=True)
class BuiltinTask:
    kind: str
    labels: tuple[str, ...]  # label names in labels.json order
    words: tuple[str, ...]  # verbalizer, same order


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "ag_news": BuiltinTask(
        "topic", ("World", "Sports", "Business", "Sci/Tech"), ("world", "sports", "business", "technology")
    ),
    "dbpedia": BuiltinTask(
        "encyclopedia",
        ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
         "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"),
        ("company", "school", "artist", "athlete", "politician", "transportation", "building", "nature",
         "village", "animal", "plant", "album", "film", "book"),
    ),
    "sst2": BuiltinTask("sentiment", ("negative", "positive"), ("negative", "positive")),
    "cr": BuiltinTask("sentiment", ("negative", "positive"), ("negative", "positive")),
    "trec": BuiltinTask(
        "question",
        ("Abbreviation", "Entity", "Description", "Person", "Location", "Number"),
        ("abbreviation", "entity", "description", "person", "location", "number"),
    ),
    "subj": BuiltinTask("subjectivity", ("subjective", "objective"), ("subjective", "objective")),
}


def default_word(label: str) -> str:
    """Verbalizer word for a label name with no built-in word: lower-cased, `_`, `-`, `/` → space."""
    return re.sub(r"\s+", " ", re.sub(r"[_/\-]+", " ", label)).strip().lower()


def builtin_for(name: str, labels: list[str]) -> tuple[str, Template, list[str]]:
    """(kind, template, verbalizer) for a task called `name` with these label names.

    The built-in words are used only when the task's labels are the built-in ones (same names, same order);
    otherwise the template of the built-in kind is kept and the words come from the label names.
    """
    key = name.lower().replace("-", "_")
    spec = BUILTIN_TASKS.get(key)
    if spec is None:
        return "generic", GENERIC, [default_word(x) for x in labels]
    words = list(spec.words) if list(spec.labels) == list(labels) else [default_word(x) for x in labels]
    return spec.kind, TEMPLATES_BY_KIND[spec.kind], words

"""Seed models, expert training, ensembles, averaging and the BTX MoE (Luigi-free library).

Importing `experts` registers the `cbtm_ensemble` model type with transformers' AutoConfig and
AutoModelForCausalLM (`experts.hf_ensemble.register`), so `AutoModelForCausalLM.from_pretrained(<ensemble folder>)`
works. Registering needs torch and transformers; when transformers is not imported yet it happens right after its
import, so that importing a light module of this package (the pipeline reads `experts.model.PRESETS` and
`experts.run_models` while it builds its graph) stays light.

Why at import, and not an explicit `register()` call: loading a saved ensemble folder through plain
`AutoModelForCausalLM.from_pretrained` (no trust_remote_code) needs the model type registered in the user's
process, and the contract every ensemble's model card (tasks.cards) and the README give users, also for folders
already written and pushed, is `import experts` and then transformers' Auto classes. transformers reads no plugin
entry points, so this package's import is the one hook it has. Registering eagerly would import torch and
transformers (~5.5 CPU s and ~320 MiB, bench/RESULTS.md) into every pipeline process at graph time, hence the
deferral to transformers' own import. (With trust_remote_code=True a folder needs none of this: its
`modeling_cbtm_ensemble.py` shim imports experts.hf_ensemble, and transformers registers the classes it names.)
The pipeline and the lm-eval wrapper need no registration: they load ensembles with
`experts.ensemble_folder.load_ensemble` and build `CBTMEnsembleForCausalLM` themselves.
"""
import importlib.abc
import importlib.machinery
import sys


def _register() -> None:
    import experts.hf_ensemble  # noqa: F401 - the module registers the model type when it is imported


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` as the other finders do and registers `cbtm_ensemble` once it has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if "experts.hf_ensemble" not in sys.modules:  # else it is being imported, and registers at its end
                _register()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())

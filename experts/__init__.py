"""Seed models, expert training, ensembles, averaging and the BTX MoE (Luigi-free library).

Importing `experts` registers the `cbtm_ensemble` model type with transformers' AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(<ensemble folder>)` works (experts.hf_ensemble).
Registering needs torch and transformers; when transformers is not imported yet it happens right after its
import, so that importing a light module of this package (the pipeline's parameter checks read
`experts.model.PRESETS` while it builds its graph) stays light.
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

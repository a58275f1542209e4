"""The built-in synthetic world: images, captions, instructions, benchmarks, preferences, text.

``generate_world(cfg, out_dir)`` builds it (``cfg``: a recipe, its ``synth`` section or a
SynthConfig). Pieces: ``world`` (vocabulary, SceneSampler), ``render``, ``language`` (captions),
``questions`` (QA with distractors), ``instructions`` (LLaVA), ``benchmarks`` (MCQ/VQA/POPE),
``preference``, ``corpus``, ``faults``.
"""

__all__ = ["generate_world"]


def __getattr__(name):
    # Lazy: `vlmforge synth --help` imports this package and must stay light.
    if name == "generate_world":
        from vlmforge.synth.generate import generate_world

        return generate_world
    raise AttributeError(name)

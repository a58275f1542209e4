"""The built-in synthetic world: images, captions, instructions, benchmarks, preferences, text.

``writer.generate_world(cfg, out_dir)`` builds it (``cfg``: a recipe, its ``synth`` section or a
SynthConfig). Pieces: ``world`` (vocabulary, SceneSampler), ``render``, ``language`` (captions),
``questions`` (QA with distractors), ``instructions`` (LLaVA), ``benchmarks`` (MCQ/VQA/POPE),
``preference``, ``corpus``, ``faults``.
"""

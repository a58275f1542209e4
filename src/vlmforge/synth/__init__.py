"""The built-in synthetic world: images, captions, instructions, benchmarks, preferences, text."""

"""The vision-language model: vision tower + projector + causal LM (vlm.py), built by build.py,
saved and loaded by saving.py, decoded by decoding.py, scored by likelihood.py, exported by export.py.

Import from the defining module (e.g. `from vlmforge.model.build import build_vlm`): this package
stays empty so that the command modules can import it without loading torch.
"""

"""LLaVA records: ``{"image": "a.jpg" | ["a.jpg", ...] (optional), "conversations": [{"from":
"human"|"gpt"|"system", "value": "...<image>..."}]}`` -> chat messages and image paths, checked."""

from __future__ import annotations

from typing import Any

from vlmforge.arch.tokens import IMAGE_TOKEN
from vlmforge.errors import UserError

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SFTDataError(UserError, ValueError):
    """A bad SFT record or file; the message names the file and line (a user error: one line, no traceback).

    ``reason`` is the short name a skipped record or sample is counted under (the index manifest's
    ``dropped``, ``SFTLoader.skipped``).
    """

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason across processes (parsing workers, DataLoader workers)
        return type(self), (str(self), self.reason)


def record_images(rec: dict) -> list[str]:
    img = rec.get("image", rec.get("images"))
    if img is None or img == "":
        return []
    if isinstance(img, str):
        return [img]
    if isinstance(img, list) and all(isinstance(x, str) for x in img):
        return list(img)
    raise SFTDataError(f"'image' must be a path or a list of paths, got {type(img).__name__}")


def llava_to_messages(rec: Any) -> tuple[list[dict], list[str]]:
    """LLaVA record -> (chat messages ``{"role", "content"}``, image paths).

    Like LLaVA, a record with images but no ``<image>`` marker gets ``<image>\\n`` markers prepended
    to its first user turn. Raises :class:`SFTDataError` (reason in ``.reason``) on a malformed record.
    """
    if not isinstance(rec, dict):
        raise SFTDataError(f"record is a {type(rec).__name__}, not an object", "not_an_object")
    conv = rec.get("conversations", rec.get("messages"))
    if not isinstance(conv, list) or not conv:
        raise SFTDataError("record has no non-empty 'conversations' list", "no_conversations")
    try:
        images = record_images(rec)
    except SFTDataError as e:
        raise SFTDataError(str(e), "bad_image_field") from None
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise SFTDataError(f"turn {i} is not an object", "bad_turn")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_MAP.get(who) if isinstance(who, str) else None
        if role is None or not isinstance(text, str):
            raise SFTDataError(f"turn {i} needs 'from' in human/gpt/system and a string 'value'", "bad_turn")
        msgs.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in msgs):
        raise SFTDataError("record has no gpt/assistant turn (nothing to learn)", "no_assistant_turn")
    n_markers = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
    if n_markers == 0 and images:
        first_user = next((m for m in msgs if m["role"] == "user"), None)
        if first_user is None:
            raise SFTDataError("record has images but no user turn to put them in", "image_token_mismatch")
        first_user["content"] = (IMAGE_TOKEN + "\n") * len(images) + first_user["content"]
    elif n_markers != len(images):
        raise SFTDataError(f"{n_markers} {IMAGE_TOKEN} marker(s) for {len(images)} image(s)", "image_token_mismatch")
    return msgs, images

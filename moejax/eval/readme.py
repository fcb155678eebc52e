"""README sections that scripts regenerate: the text between a pair of HTML comment markers."""

from __future__ import annotations


def replace_between(path: str, begin: str, end: str, body: str) -> None:
  """Rewrites `path` with the text between the markers `begin` and `end` replaced by `body`.

  The markers themselves stay. Raises ValueError naming the fix when either
  marker is missing, so a README is never rewritten without them.
  """
  with open(path) as f:
    text = f.read()
  if begin not in text or end not in text:
    raise ValueError(f"{path} has no {begin} ... {end} markers; add them where the generated text goes.")
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(head + begin + "\n" + body + "\n" + end + tail)

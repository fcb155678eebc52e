r"""Extracts the World English Bible (public domain) into plain-text train / held-out splits.

The text comes from Debian's `sword-text-web` package (SWORD module
`engWEB2015eb`); `mod2imp` from `libsword-utils` dumps it with OSIS markup,
which this script strips: Strong's numbers, footnotes, cross references,
variant readings, speaker labels, section headings and introductions are
dropped; the verse text is kept.

  apt-get install sword-text-web libsword-utils
  mod2imp engWEB2015eb > /tmp/web.imp
  python experiments/prepare_corpus.py --imp=/tmp/web.imp --out=third_party/world_english_bible

Output: one chapter per block ("Book N" line, then one verse per line, then a
blank line). Every `--heldout_every`-th chapter (counted over the whole
Bible, starting at `--heldout_offset`) goes to `heldout.txt`, the rest to
`train.txt`, so that both splits cover every book and genre.
"""

import html
import os
import re

from absl import app, flags

_IMP = flags.DEFINE_string("imp", "/tmp/web.imp", "mod2imp dump of the engWEB2015eb module.")
_OUT = flags.DEFINE_string("out", "third_party/world_english_bible", "Output folder.")
_HELDOUT_EVERY = flags.DEFINE_integer("heldout_every", 20, "Hold out one chapter in this many.")
_HELDOUT_OFFSET = flags.DEFINE_integer("heldout_offset", 7, "Index of the first held-out chapter.")

_KEY = re.compile(r"^\$\$\$(.+) (\d+):(\d+)$")
_DROP = re.compile(r"<(note|title|rdg|speaker)\b[^>]*?(?<!/)>.*?</\1>", re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?’”)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([“‘(\[])\s+")


def clean(osis: str) -> str:
  """One verse's OSIS markup -> plain text on one line."""
  text = _DROP.sub(" ", osis)
  text = _TAG.sub(" ", text)
  text = html.unescape(text)
  text = " ".join(text.split())
  text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
  return _SPACE_AFTER_OPEN.sub(r"\1", text)


def chapters(imp_path: str) -> list[tuple[str, list[str]]]:
  """[(\"Book N\", [verse, ...])] in canonical order; introductions (verse 0) are skipped."""
  out: list[tuple[str, list[str]]] = []
  key, lines = None, []

  def flush():
    if key is None or key[2] == 0:
      return
    verse = clean(" ".join(lines))
    if not verse:
      return
    name = f"{key[0]} {key[1]}"
    if not out or out[-1][0] != name:
      out.append((name, []))
    out[-1][1].append(verse)

  with open(imp_path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\n")
      if line.startswith("$$$"):
        flush()
        m = _KEY.match(line)
        key = (m.group(1), int(m.group(2)), int(m.group(3))) if m else None
        lines = []
      else:
        lines.append(line)
  flush()
  return out


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  splits = {"train": [], "heldout": []}
  for i, (name, verses) in enumerate(chapters(_IMP.value)):
    held = i % _HELDOUT_EVERY.value == _HELDOUT_OFFSET.value
    splits["heldout" if held else "train"].append(name + "\n" + "\n".join(verses) + "\n")
  for split, blocks in splits.items():
    path = os.path.join(_OUT.value, f"{split}.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(blocks))
    print(f"{path}: {len(blocks)} chapters, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
  app.run(main)

"""Regenerated README sections: only the text between the markers changes."""

import pytest

from moejax.eval.readme import replace_between


def test_replace_between_keeps_the_rest(tmp_path):
  path = tmp_path / "README.md"
  path.write_text("# title\n\n<!-- a:begin -->\nold table\n<!-- a:end -->\n\nmore text\n")
  replace_between(str(path), "<!-- a:begin -->", "<!-- a:end -->", "| new |")
  assert path.read_text() == "# title\n\n<!-- a:begin -->\n| new |\n<!-- a:end -->\n\nmore text\n"


def test_replace_between_without_markers_changes_nothing(tmp_path):
  path = tmp_path / "README.md"
  path.write_text("# title\n<!-- a:begin -->\n")
  with pytest.raises(ValueError, match="no <!-- a:begin --> ... <!-- a:end --> markers"):
    replace_between(str(path), "<!-- a:begin -->", "<!-- a:end -->", "x")
  assert path.read_text() == "# title\n<!-- a:begin -->\n"

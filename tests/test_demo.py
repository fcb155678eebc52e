"""The README's first command runs: the demo decodes on the shipped model and prints its stats."""

from moejax import demo


def test_demo_prints_text_and_stats(capsys):
  demo.main(["--max_new_tokens", "4"])
  out = capsys.readouterr().out
  assert "== resident" in out and "== smoe" in out
  assert out.count("hit ratio") == 2 and "TPOT" in out

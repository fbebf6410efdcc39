"""Blind pairwise human evaluation of generated text.

A system is a run; an item is a prompt that at least two runs continued in RUN_DIR/eval/samples.jsonl.
Raters judge two continuations of one prompt in a small web app (`app.py`, votes in SQLite via
`store.py`); `results.py` turns the votes into win rates, Bradley-Terry scores and agreement
(`stats.py`). The web dependencies (the `humaneval` extra) are imported only by `app.py` and `cli.py`.
"""

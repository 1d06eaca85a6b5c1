"""``hfx bench``: side-by-side comparisons of hfx's methods on the built-in task, offline, with JSON/Markdown/PNG out.

- :mod:`hfx.bench.tuners`: every tuner (plus PEFT LoRA and full fine-tuning) adapts the cached tiny base from the
  easy to the hard arithmetic problems at one recipe and a comparable trainable-parameter budget; accuracy,
  forgetting, loss, parameters, memory, time, init time; several seeds.
- :mod:`hfx.bench.trainers`: each hfx trainer against its own baseline on the same budget.
- :mod:`hfx.bench.speed`: step time and training memory of every tuner vs PEFT LoRA on a random-init model of a real
  shape, interleaved in one run.
- :mod:`hfx.bench.report`: per-run JSON, the Markdown summary and the plots.

Each run writes ``<out>/runs/<name>.json`` and is skipped when that file exists with the same settings (recipe, method
config, versions, model files); a record made with other settings is not replaced unless ``--force`` (which redoes
the run), and an unreadable one is redone with a warning.
"""


def help_description(doc: str) -> str:
    """A sub-command's ``--help`` description: its module docstring's first paragraph as plain text (the first
    line alone cut sentences off, and the reST double backquotes showed)."""
    first = doc.strip().split("\n\n")[0]
    return " ".join(first.split()).replace("``", "")

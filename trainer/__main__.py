"""`python -m thresher.trainer train|export ...`: the trainer commands without the top-level CLI."""

from thresher.trainer.cli import main

main(prog_name="python -m thresher.trainer")

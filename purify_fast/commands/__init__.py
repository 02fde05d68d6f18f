"""One module per ``purify-fast`` subcommand (see ``purify_fast.cli``)."""

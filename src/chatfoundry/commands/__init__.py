"""The `chatfoundry` subcommands, in groups; cli.py registers them."""

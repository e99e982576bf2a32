"""The ``streamcnn`` application: the command-line tool's subcommands
(synth, train, evaluate, export, predict) and the run folder's files."""

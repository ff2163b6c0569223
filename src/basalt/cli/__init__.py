"""basaltctl: the command-line client. One module per verb group."""

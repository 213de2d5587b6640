"""`cusedev run`: seccomp user notification, the launcher that owns CMD's tree, the command."""

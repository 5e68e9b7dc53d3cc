"""The `bigmodel` command: info, bench."""

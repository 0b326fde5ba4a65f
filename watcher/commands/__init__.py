"""One module per CLI command: each is a plain function that does the work and returns data
or an exit code; watcher.cli only parses options and maps errors to exit codes."""

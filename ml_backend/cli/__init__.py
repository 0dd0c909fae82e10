"""The command-line tools: `scripts/<name>.py` and the `emloop-<name>` console entry points run
`main()` of the module here. Each ends through `sdk.cli.run_main`: one line on stderr, exit status
0 done, 1 runtime failure, 2 bad input, 130 interrupted."""

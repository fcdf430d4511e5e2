"""The operator's side: the `tidelog` command line, benchmarks, the demo and the process launcher."""

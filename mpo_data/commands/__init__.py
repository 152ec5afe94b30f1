"""One thin module per `mpo-data` command: `add_arguments(parser)` declares its flags (from the library's config
dataclasses where it has one), `main(args)` calls one library function and prints what a person needs."""

"""CLI commands, one module per command or command group, all in one style: each command is a
top-level ``*_command`` function (its options in the signature, its docstring the help) and the
module's ``register(app)`` adds them (:func:`~boxcaseg.commands.options.add_command`,
:func:`~boxcaseg.commands.options.command_group`). A command parses, calls the library, prints;
heavy imports stay inside the functions."""

"""The ``dprdm`` command line: the top layer. Every sub-command's argument parsing and printing
lives here (``main`` is the dispatcher, ``args`` the shared argument types and :class:`CliError`);
nothing in the project imports this package.
"""

"""``python -m taskserver`` is the ``taskserver`` command."""

from .cli import main

main()

"""``python -m dynstore`` runs the command line."""
from dynstore.cli import main

main()

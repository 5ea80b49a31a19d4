"""python -m qwenft"""

from qwenft.cli import main

main()

"""python -m router --workers host:port[,host:port] --port N"""

from router.cli import main

main()

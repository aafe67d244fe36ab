"""python -m worker_cpu --model PATH --port N"""

from worker_cpu.cli import main

main()

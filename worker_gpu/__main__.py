"""python -m worker_gpu --model PATH --port N"""

from worker_gpu.cli import main

main()

"""python -m worker_openai --base-url http://host:8000/v1 --model NAME --port N"""

from worker_openai.cli import main

main()

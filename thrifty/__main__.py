from thrifty.cli import run

run()

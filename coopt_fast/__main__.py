from coopt_fast.cli import main

main()

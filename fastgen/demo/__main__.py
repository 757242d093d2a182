from fastgen.demo.cli import main

main()

from diffusion.cli import main

main()

"""Wire formats shared by the packager, the controller and the agent.

Nothing here needs the quantization stack or a web server: a gateway verifies packages and desired
states with ``cryptography`` alone.
"""

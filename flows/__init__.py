"""The image-search flow, its parameters, its command line and the Prefect API a command-line
run talks to."""

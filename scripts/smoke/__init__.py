"""The parts of scripts/docker_smoke.py, one job each: `dockerfile` reads the Dockerfile, `build`
replays its stages in the scratch root, `container` runs the image's entry point as the container
would, `checks` probes the running server, `report` keeps the timing table; `errors` has the one
error they raise."""

"""The local world: dev portal, netns topologies, relay launcher, demo and benchmarks."""

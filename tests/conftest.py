pytest_plugins = ["feste.testing.fixtures"]

"""tidelog clusters in docker: the engine (engine.py), the images (images.py), a compose
cluster and its faults (cluster.py), and the ``tidelog docker`` commands (commands.py)."""

"""Video: 2D->3D inflation of registry backbones, Kinetics data, multi-view testing and the video task adapter."""

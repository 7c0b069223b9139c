"""posttrain.envs"""

"""posttrain.trainer"""

"""Developer tools: ahead-of-time compile report (``compile_report``) and the config tuner (``tune``)."""

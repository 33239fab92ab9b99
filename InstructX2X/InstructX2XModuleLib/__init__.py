"""Qt-free helpers of the InstructX2X Slicer module.

``worker`` imports neither slicer nor qt (the worker client); ``scene`` imports slicer but
not qt (MRML in and out), so both are tested outside the Slicer application.
"""

"""Launch from the EHR: IHE Invoke Image Display and SMART App Launch.

See docs/conformance/launch.md.
"""

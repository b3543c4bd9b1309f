"""mdmd: a Windows MDM server (MS-MDE2 enrollment, OMA-DM management) on Twisted."""

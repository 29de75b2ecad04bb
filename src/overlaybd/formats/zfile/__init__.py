"""ZFile: a compressed container read at random through a jump table."""

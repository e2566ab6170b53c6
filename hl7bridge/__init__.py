"""hl7bridge: an HL7 v2 interface engine. MLLP in, durable journal, declarative mapping, CRM upserts out."""

__version__ = "0.1.0"

"""FHIR R4 (4.0.1) face of the portal: DiagnosticReport in and out, ImagingStudy, Patient,
ServiceRequest (orders) and Appointment (scheduled orders) out, the CapabilityStatement, and
OperationOutcome for every error under ``/fhir`` (docs/architecture.md "Interfaces")."""

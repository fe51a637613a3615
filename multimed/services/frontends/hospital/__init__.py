"""The hospital front door: studies read from configured PACS over DICOMweb, answered for every
task they support, and the results written back as a DICOM SR into the same study and as a FHIR
R4B transaction bundle for the EHR."""
